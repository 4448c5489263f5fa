"""A contract type for import-linter (pyproject.toml [tool.importlinter]) that its built-in ones lack:
only some modules may import a *subpackage* of an external package (`torch.distributed`), which
forbidden contracts cannot name (import-linter sees an external package as one module, `torch`)."""
from __future__ import annotations

import re

from importlinter import Contract, ContractCheck, fields, output


class OnlyImportersContract(Contract):
    """`imported` (e.g. torch.distributed) is imported by the `allowed` modules of the root packages only."""

    type_name = "only_importers"

    imported = fields.StringField()
    allowed = fields.ListField(subfield=fields.StringField())

    def check(self, graph, verbose: bool) -> ContractCheck:
        top, _, rest = self.imported.partition(".")
        parent, _, leaf = self.imported.rpartition(".")
        # `import torch.distributed[.x]`, `from torch.distributed[.x] import ...`, `from torch import distributed`
        pattern = re.compile(rf"^\s*(import|from)\s+{re.escape(self.imported)}\b"
                             rf"|^\s*from\s+{re.escape(parent)}\s+import\s+(.*[\s,(])?{re.escape(leaf)}\b")
        offenders = []
        for importer in sorted(graph.modules):
            if importer in self.allowed or top not in graph.find_modules_directly_imported_by(importer):
                continue
            for detail in graph.get_import_details(importer=importer, imported=top):
                if pattern.search(detail["line_contents"]):
                    offenders.append(f"{importer}:{detail['line_number']}: {detail['line_contents']}")
        return ContractCheck(kept=not offenders, metadata={"offenders": offenders})

    def render_broken_contract(self, check: ContractCheck) -> None:
        output.print_error(f"only {', '.join(self.allowed)} may import {self.imported}; these do:")
        for line in check.metadata["offenders"]:
            output.indent_cursor()
            output.print_error(line)
