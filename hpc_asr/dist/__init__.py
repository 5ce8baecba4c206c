"""Distributed: ``launch`` (which launcher, rank/size/local rank) and ``engines`` (horovod, torch)."""
