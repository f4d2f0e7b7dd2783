# A config that trains in seconds (tests, smoke checks): 32 px MREF, 48 items.
_base_ = ['./pan_mbg_arnn.py']
image_size = 32
model = dict(image_size=32, hidden_channels=4, channels=8, num_stacks=3, head_hidden=16)
_data = dict(type='MultiDigitTensors', variant='mref', task='color', size=32, seed=0, cache_dir=None)
train_dataloader = dict(batch_size=8, dataset=dict(_data, split='train', length=48))
val_dataloader = dict(batch_size=16, dataset=dict(_data, split='val', length=16))
test_dataloader = dict(batch_size=16, dataset=dict(_data, split='test', length=16))
max_iters = 6
train_cfg = dict(type='IterBasedTrainLoop', max_iters=6, val_interval=6)
param_scheduler = [dict(type='CosineAnnealingLR', by_epoch=False, begin=0, end=6, eta_min=1e-4)]
default_hooks = dict(logger=dict(interval=2), checkpoint=dict(interval=3))
