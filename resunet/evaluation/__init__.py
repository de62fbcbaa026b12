"""resunet.evaluation"""
