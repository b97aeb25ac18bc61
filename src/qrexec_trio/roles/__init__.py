"""The programs: thin modules wiring the protocol, vchans and nursery together."""
