"""rescli: fine-tune ImageNet ResNets on a folder of images, from the command line."""

__version__ = "0.1.0"
