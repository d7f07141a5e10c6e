"""rmbg"""
