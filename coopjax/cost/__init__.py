"""What communication costs: the mixes' cost records, the α–β network model, the compiled
program's collectives.

* :mod:`coopjax.cost.pattern`: :class:`MixCost`, the cost record of one mix
  (derived from its matrix), and :func:`comm_pattern` of a transformation;
* :mod:`coopjax.cost.netmodel`: the α–β model that prices a :class:`MixCost`;
* :mod:`coopjax.cost.report`: :func:`coopjax.comm_report`, the collectives of a
  compiled step read from its HLO.
"""

from coopjax.cost import netmodel
from coopjax.cost import pattern
from coopjax.cost import report
from coopjax.cost.pattern import NO_COMM
from coopjax.cost.pattern import CommPattern
from coopjax.cost.pattern import MixCost
from coopjax.cost.pattern import comm_pattern

__all__ = ["CommPattern", "MixCost", "NO_COMM", "comm_pattern", "netmodel", "pattern", "report"]
