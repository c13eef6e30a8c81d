"""The native half of the stand-in: emulated devices and the HCCL process group."""
