"""selfmask.cascade"""
