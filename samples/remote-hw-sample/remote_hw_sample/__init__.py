"""Sample remote-hw plugins (a scratch-register device and an echo backend), found by
remote-hw through this distribution's entry points."""
