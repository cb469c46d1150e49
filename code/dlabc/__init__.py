"""Deep Learning ABC: the tested implementations behind the executable book.

One module per chapter, in folders named like the book's parts
(``book/transformers/attention_from_scratch.md`` imports
``dlabc.transformers.attention_from_scratch``; its tests live in
``tests/transformers/test_attention_from_scratch.py``). The shared helpers are few:

- :mod:`dlabc.book`   -- what every chapter calls: set-up, device, showing code, gluing
numbers;
- :mod:`dlabc.checks` -- argument checks that give clear errors;
- :mod:`dlabc.data`   -- every data set, loaded in one place;
- :mod:`dlabc.plot`   -- the figure helpers the chapters share.
"""

__version__ = "0.1.0"
