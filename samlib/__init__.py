"""samlib: the SAMResNets method (SE-ResNet, MixUp, Lookahead, EMA, TTA) as a small library."""

__version__ = "0.1.0"
