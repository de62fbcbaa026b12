"""resunet.reports"""
