# PAN attribute network with AttentionRNN on MBG (paper 4.1), sized for a CPU
# as the small reproduction: 48 px images with 2-3 large digits (scales
# 1.5-3.0), 10000 training items, 800 iterations of batch 32, the head reading
# the last map pooled with the last mask (about 4 minutes on 2 idle cores).
# The same run as arnn_plugins.experiments.pan_config('arnn', CONFIG_SCALE,
# n_val=500) (tests/test_engine.py checks that the two agree).
# For the paper's sizes: image_size=100, 5-9 digits at scales 0.5-3.0, lengths
# 30000 / 10000 / 10000 and many more iterations (see `arnn-plugins reproduce`).
custom_imports = dict(imports=['arnn_plugins.engine'], allow_failed_imports=False)

image_size = 48
variant = 'mbg'
task = 'color'
data_seed = 0
batch_size = 32

model = dict(type='PANModel', attention='arnn', image_size=image_size, num_classes=5, num_queries=10,
             hidden_channels=16, channels=32, num_stacks=4, batch_norm=True, readout='pool')

_data = dict(type='MultiDigitTensors', variant=variant, task=task, size=image_size, seed=data_seed,
             num_digits=(2, 3), scale_range=(1.5, 3.0), cache_dir='default')
train_dataloader = dict(
    batch_size=batch_size, num_workers=0,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(_data, split='train', length=10000))
val_dataloader = dict(
    batch_size=64, num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(_data, split='val', length=500))
test_dataloader = dict(
    batch_size=64, num_workers=0,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(_data, split='test', length=500))
val_evaluator = dict(type='PANMetric')
test_evaluator = val_evaluator

max_iters = 800
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='Adam', lr=2e-3), clip_grad=dict(max_norm=5.0))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.1, by_epoch=False, begin=0, end=20),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=20, end=max_iters, eta_min=1e-4),
]

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=max_iters, by_epoch=False, max_keep_ckpts=2),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
log_processor = dict(by_epoch=False, window_size=20)
log_level = 'INFO'
randomness = dict(seed=0)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='auto'))  # auto: NCCL on CUDA, gloo on CPU
load_from = None
resume = False
