"""From a rule's YAML to Python: JMESPath compiled to closures, custom functions, generated mapping code."""
