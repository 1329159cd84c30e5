"""Helpers shared by test modules (tests/ is on sys.path under pytest, so this imports as `helpers`).

Test modules never import each other: what two of them share lives here, defined once.
"""
