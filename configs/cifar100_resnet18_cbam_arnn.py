# CIFAR-100, ResNet18 (CIFAR stem: 3x3 stride-1 conv, no max-pool) with CBAM
# whose spatial branch is AttentionRNN (paper 4.2). CIFAR-100 is read from a
# local torchvision folder (`data_root`/cifar-100-python), never downloaded:
#   arnn-plugins train configs/cifar100_resnet18_cbam_arnn.py --cfg-options data_root=/path/to/cifar
custom_imports = dict(imports=['arnn_plugins.engine'], allow_failed_imports=False)

data_root = 'data/cifar100'
attention = 'cbam_arnn'
model = dict(type='CifarResNet', arch='resnet18', num_classes=100, attention=attention, swap_mode='replace',
             arnn_kwargs=dict(hidden_channels=16, context_kernel=3))

train_dataloader = dict(
    batch_size=128, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='CIFAR100Dict', root=data_root, train=True))
val_dataloader = dict(
    batch_size=256, num_workers=2, persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='CIFAR100Dict', root=data_root, train=False))
test_dataloader = val_dataloader
val_evaluator = dict(type='AccuracyMetric')
test_evaluator = val_evaluator

max_epochs = 200
train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=max_epochs, val_interval=5)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(type='OptimWrapper',
                     optimizer=dict(type='SGD', lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True))
param_scheduler = [dict(type='MultiStepLR', by_epoch=True, milestones=[60, 120, 160], gamma=0.2)]

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=5, max_keep_ckpts=3, save_best='cls/accuracy', rule='greater'),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
log_processor = dict(by_epoch=True, window_size=50)
log_level = 'INFO'
randomness = dict(seed=0)
env_cfg = dict(cudnn_benchmark=True, dist_cfg=dict(backend='auto'))  # auto: NCCL on CUDA, gloo on CPU
load_from = None
resume = False
