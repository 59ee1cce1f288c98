"""selfmask.evaluation"""
