"""The networks and their files.

    registry     the architectures (torchvision ResNets, CIFAR-style nets) and how to build one
    cifar        the CIFAR-style residual and plain networks
    weights      starting weights: ImageNet, a weights file, or a rescli checkpoint's backbone
    checkpoint   the self-describing checkpoint: saved, loaded as data only, checked
"""
