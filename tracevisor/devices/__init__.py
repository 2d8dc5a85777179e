"""Emulated devices: the PCI bus (config mechanism #1) and the devices that register on it."""
