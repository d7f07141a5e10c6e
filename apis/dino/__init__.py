"""dino"""
