# ModularGAN on CelebA with AttentionRNN transformer masks (paper 4.4):
# hair colour (black / blond / brown), gender, smile. CelebA in its published
# layout (img_align_celeba/, list_attr_celeba.txt, list_eval_partition.txt).
#   arnn-plugins train configs/mgan_arnn.py --cfg-options data_root=/path/to/celeba
custom_imports = dict(imports=['arnn_plugins.engine'], allow_failed_imports=False)

data_root = 'data/celeba'
image_size = 128
mask = 'arnn'
model = dict(type='MGANModel', num_values=[3, 2, 2], mask=mask, image_size=image_size, base=64,
             n_res_encoder=3, n_res_transformer=3, d_base=64,
             lambda_cls=1.0, lambda_rec=10.0, lambda_cyc=10.0, lambda_gp=10.0,
             arnn_kwargs=dict(hidden_channels=16, context_kernel=3))

train_dataloader = dict(
    batch_size=16, num_workers=4,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    collate_fn=dict(type='default_collate'),
    dataset=dict(type='CelebADict', root=data_root, image_size=image_size, split='train', flip=True))

max_iters = 200000
train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters)
optim_wrapper = dict(constructor='MGANOptimWrapperConstructor',
                     optimizer=dict(type='Adam', lr=1e-4, betas=(0.5, 0.999)))
param_scheduler = []

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    checkpoint=dict(type='CheckpointHook', interval=10000, by_epoch=False, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
)
log_processor = dict(by_epoch=False, window_size=100)
log_level = 'INFO'
randomness = dict(seed=0)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='auto'))  # auto: NCCL on CUDA, gloo on CPU
load_from = None
resume = False
