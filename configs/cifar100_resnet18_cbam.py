# The baseline of cifar100_resnet18_cbam_arnn.py: ResNet18 with plain CBAM.
_base_ = ['./cifar100_resnet18_cbam_arnn.py']
attention = 'cbam'
model = dict(attention='cbam')
