"""epochd: a daemon that trains PyTorch and TensorFlow models epoch by epoch from job files in a spool.

Everything here is framework-free; the daemon process never imports torch or tensorflow.
"""
__version__ = "0.1.0"
