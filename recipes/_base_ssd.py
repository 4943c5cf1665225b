"""What kdet's SSD recipes share: the SSD paper's model and training set-up.

Recipes import this and merge their differences (see kdet.config.merge).
Every key here can be overridden from the command line: --set train.epochs=5.

This is kdet's default recipe, kdet.defaults.default_recipe(): the one home of every
key, its default and its comment (the recipe schema: an unknown key is an error).
Print it with: python -c "import pprint, kdet.defaults as d; pprint.pprint(d.default_recipe())"
A new recipe key goes into kdet/defaults.py; a recipe's own keys go under custom=dict(...).
"""

from kdet.defaults import default_recipe

recipe = default_recipe()
