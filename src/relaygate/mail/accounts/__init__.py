"""Mail accounts: the user database (:mod:`.db`) and login throttling (:mod:`.throttle`)."""
