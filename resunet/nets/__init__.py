"""resunet.nets"""
