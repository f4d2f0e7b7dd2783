# As pan_mbg_arnn.py with PAN's local 3x3-context attention (CTX) instead of ARNN.
_base_ = ['./pan_mbg_arnn.py']
model = dict(attention='ctx')
