"""Checking the claim: canaries, the membership audit and its confidence bounds."""
