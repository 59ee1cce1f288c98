"""selfmask.storage"""
