# VQA v2 with MCB whose glimpse attention is query-conditioned AttentionRNN
# (paper 4.3). Inputs in the published formats (see arnn_plugins.models.vqa_data):
# questions / annotations JSON from visualqa.org and precomputed image
# features (e.g. ResNet-152 res5c, 2048 x 14 x 14) per image id.
#   arnn-plugins train configs/mcb_arnn.py --cfg-options data_root=/path/to/vqa
custom_imports = dict(imports=['arnn_plugins.engine'], allow_failed_imports=False)

data_root = 'data/vqa'
train_questions = data_root + '/v2_OpenEnded_mscoco_train2014_questions.json'
train_annotations = data_root + '/v2_mscoco_train2014_annotations.json'
val_questions = data_root + '/v2_OpenEnded_mscoco_val2014_questions.json'
val_annotations = data_root + '/v2_mscoco_val2014_annotations.json'
train_features = data_root + '/features/train2014'
val_features = data_root + '/features/val2014'
num_answers = 3000
vocab_size = 15000
img_channels = 2048

model = dict(type='MCBModel', kind='mcb_arnn', num_answers=num_answers, img_channels=img_channels,
             vocab_size=vocab_size, mcb_dim=16000, att_hidden=512, glimpses=2,
             arnn_kwargs=dict(hidden_channels=64, context_kernel=1))

_vocab = dict(vocab_questions=train_questions, vocab_annotations=train_annotations, num_answers=num_answers,
              vocab_size=vocab_size)
train_dataloader = dict(
    batch_size=64, num_workers=4,
    sampler=dict(type='DefaultSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='VQADict', questions=train_questions, annotations=train_annotations,
                 features=train_features, **_vocab))
val_dataloader = dict(
    batch_size=128, num_workers=4,
    sampler=dict(type='DefaultSampler', shuffle=False),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='VQADict', questions=val_questions, annotations=val_annotations,
                 features=val_features, **_vocab))
test_dataloader = val_dataloader
val_evaluator = dict(type='VQAMetric')
test_evaluator = val_evaluator

train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=10, val_interval=1)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
optim_wrapper = dict(type='OptimWrapper', optimizer=dict(type='Adam', lr=7e-4), clip_grad=dict(max_norm=10.0))
param_scheduler = [dict(type='StepLR', by_epoch=True, step_size=4, gamma=0.5)]

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
log_level = 'INFO'
randomness = dict(seed=0)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='auto'))  # auto: NCCL on CUDA, gloo on CPU
load_from = None
resume = False
