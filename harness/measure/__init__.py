"""Measuring a case: the session, the case's steps (reference, pipeline call, parity, components alone), workers,
timing, memory, device facts and progress."""
