"""selfmask.training"""
