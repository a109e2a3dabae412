"""Deployment helpers: the local nginx balancer config (nginx.py) and the demo user (demo_user.py)."""
