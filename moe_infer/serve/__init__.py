"""Serving: requests in, results out.

cli.py        the batch serving command line (launch/infer.py): read and check every request, start the engine,
              serve, write the outputs in input order
requests.py   reading, encoding and checking requests; formatting outputs
flags.py      the flags every command that serves an export shares, and what they turn into
process.py    one launched rank: results on stdout, one clear message per error, the process group closed
"""
