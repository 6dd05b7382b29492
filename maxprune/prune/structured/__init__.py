"""Structured methods: Minitron depth/width, FLAP; the shapes they cut to and the surgery that cuts."""
