"""tracevisor: a uhyve-compatible record-and-replay tracing hypervisor on Linux KVM."""

__version__ = "0.1.0"
