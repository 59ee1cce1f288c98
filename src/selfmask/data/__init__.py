"""selfmask.data"""
