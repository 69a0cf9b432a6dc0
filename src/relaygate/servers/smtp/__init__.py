"""The SMTP server: aiosmtpd listeners (:mod:`.service`) and relay control (:mod:`.handler`)."""
