import os
import sys

# tests/reference.py (the literal model of the rules) is imported by several test files.
sys.path.insert(0, os.path.dirname(__file__))
