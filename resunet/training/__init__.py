"""resunet.training"""
