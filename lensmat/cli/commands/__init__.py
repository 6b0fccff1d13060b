"""The subcommands of ``lensmat``, one module per command or per closely related pair, each with its
options beside its handler; :data:`COMMANDS` is the table :func:`lensmat.cli.app.build_parser`
loops over, in the order ``lensmat --help`` lists them."""

from lensmat.cli.commands.attribute import ATTRIBUTE
from lensmat.cli.commands.compare import COMPARE
from lensmat.cli.commands.intervene import INTERVENE
from lensmat.cli.commands.linearity import LINEARITY
from lensmat.cli.commands.maps import FIT, IMPORT_MAPS
from lensmat.cli.commands.model import INFO, PLAN
from lensmat.cli.commands.saturation import EARLY_EXIT, SATURATION
from lensmat.cli.commands.submodules import SUBMODULES
from lensmat.cli.commands.trajectory import TRAJECTORY
from lensmat.cli.commands.transfer import TRANSFER
from lensmat.cli.commands.view import VIEW

COMMANDS = (INFO, PLAN, FIT, COMPARE, TRANSFER, SUBMODULES, LINEARITY, SATURATION, EARLY_EXIT, IMPORT_MAPS, TRAJECTORY, INTERVENE, ATTRIBUTE, VIEW)

__all__ = ["COMMANDS"]
