"""resunet.inference"""
