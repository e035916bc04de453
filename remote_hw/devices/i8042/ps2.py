"""The bytes every PS/2 device answers with, keyboard and mouse alike.

Both devices behind the controller speak the same byte protocol to the host: each
command byte is acknowledged (or refused with "resend"), and a reset ends with the
self-test result. Kept apart so the keyboard and the mouse share one definition.
"""

KBD_ACK = 0xFA      # command (or argument) accepted
KBD_RESEND = 0xFE   # not understood: the host should send it again (or give up)
KBD_BAT_OK = 0xAA   # basic assurance test passed (after a reset)
