"""CIFAR-10 with a torchvision ResNet-18 adapted to 32x32 images (LightningCLI example)."""
