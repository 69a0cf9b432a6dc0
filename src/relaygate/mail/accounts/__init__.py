"""Mail accounts: the user database (:mod:`.db`: accounts, logins, administration,
passwd import), password hash formats (:mod:`.hashes`), login throttling
(:mod:`.throttle`) and their errors (:mod:`.errors`)."""
