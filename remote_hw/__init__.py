"""remote-hw: virtual machines that use devices living on other machines."""

__version__ = "0.1.0"
