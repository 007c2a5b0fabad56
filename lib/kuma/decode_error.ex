defmodule Kuma.DecodeError do
  @moduledoc """
  Raised when a stored event cannot be decoded: `reason` is `:unknown_atom` (the store runs
  with `decode: :safe` and the event uses an atom this VM does not know) or `:malformed`
  (the bytes are not a valid external term; `Kuma.verify/2` will name the damaged event).
  """
  defexception [:entity_id, :seq, :type, :reason]

  @impl true
  def message(%{entity_id: id, seq: seq, type: type, reason: :unknown_atom}) do
    "cannot decode event #{seq} of entity #{inspect(id)} (type #{inspect(type)}): it uses an atom " <>
      "unknown to this VM and the store runs with decode: :safe; load the modules of your events first"
  end

  def message(%{entity_id: id, seq: seq, type: type}) do
    "cannot decode event #{seq} of entity #{inspect(id)} (type #{inspect(type)}): the stored bytes are " <>
      "not a valid term; run Kuma.verify/2"
  end
end
