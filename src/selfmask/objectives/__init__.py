"""selfmask.objectives"""
