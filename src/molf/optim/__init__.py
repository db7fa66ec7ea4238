r"""MoLFAdamW: AdamW whose update each MoLF layer routes to its Top-K experts.

For every expert ``e`` (the FFT expert ``W, b`` or a LoRA expert ``A_i, B_i``) of
every MoLF layer, each step:

.. math::
    m_e &\leftarrow \beta_1 m_e + (1-\beta_1) g_e, \qquad
    v_e \leftarrow \beta_2 v_e + (1-\beta_2) g_e^2, \qquad t_e \leftarrow t_e + 1 \\
    S_e^{EPD} &= \frac{\mathrm{lr}_e}{N_e} \sum \frac{m_e^2}{\sqrt{v_e} + \epsilon}, \qquad
    S_e^{PFN} = \sqrt{\frac{1}{N_e} \sum \Big(\frac{m_e}{\sqrt{v_e} + \epsilon}\Big)^2}

with raw (not bias-corrected) moments and ``N_e`` the expert's parameter count. In
each layer the ``top_k`` experts with the highest score (ties to the lower index,
FFT first) take the AdamW update

.. math::
    \theta \leftarrow \theta (1 - \mathrm{lr}\,\lambda)
        - \mathrm{lr} \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}

and the others keep their weights (their moments still moved). A NaN or infinite
score never wins: a layer whose scores are all non-finite updates no expert (their
moments still move). Parameters outside MoLF layers get plain AdamW. A non-finite
gradient anywhere skips the whole step.

``betas`` and ``eps`` are shared by every parameter group (one pass serves them all):
changing them in every group (e.g. a momentum schedule) takes effect at the next step;
groups that disagree are refused. float16 parameters are refused (their moments
underflow; use bfloat16, float32 or float32 weights under autocast); float64 ones
train with float64 moments, updates and scores.

A step makes three passes over the experts, and (but for ``"reference"``) no host-device
synchronisation:

1. is any gradient non-finite (a 0-d ``found_inf`` tensor, never read on the host);
2. the moments of every expert (left alone when ``found_inf``), and per-tensor score
   partial sums, scattered into a ``[modules x experts]`` table;
3. Top-K routing as tensor ops on that table, then the AdamW update of the winners.

Parameters outside MoLF layers take torch's fused AdamW (gated by ``found_inf``).
Passes 2 and 3 are the *routed step* (:mod:`molf.optim.functional`: one signature),
with four implementations that compute the same thing (to float32 rounding):

* ``"reference"`` (:mod:`molf.optim.reference`): the equations one tensor at a time in
  float64; slow and synchronising, the spec the others are checked against;
* ``"foreach"`` (:mod:`molf.optim.foreach`): torch's ``_foreach`` ops on bounded
  buckets of tensors; any device, dtype or tensor subclass;
* ``"cpu_kernel"`` (:mod:`molf.optim.cpu_kernel`): C loops that do passes 2 and 3
  module by module while the moments are in the cache, and never touch the losers'
  weights; float32 on the CPU (other dtypes use foreach);
* ``"triton"`` (:mod:`molf.optim.triton_kernel`): one kernel launch per pass over all
  tensors; float32 on a GPU.

Around them: :mod:`molf.optim.optimizer` (the :class:`MoLFAdamW` class: state and
the step), :mod:`molf.optim.groups` (parameter groups and the routing table's cells),
:mod:`molf.optim.validation` (what the optimizer refuses: hyperparameters, float16,
state that does not fit), :mod:`molf.optim.implementations` (which routed step runs),
:mod:`molf.optim.skips` (the skipped-step count, kept without syncs).
"""

from molf.optim.functional import Routing, select_top_k
from molf.optim.implementations import IMPLEMENTATIONS
from molf.optim.optimizer import MoLFAdamW

__all__ = ["IMPLEMENTATIONS", "MoLFAdamW", "Routing", "select_top_k"]
