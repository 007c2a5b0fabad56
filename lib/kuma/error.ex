defmodule Kuma.Error do
  @moduledoc """
  Raised by the few functions that cannot return an error tuple (enumerating
  `Kuma.stream/3`). `reason` is the same term the tuple-returning functions give.
  """
  defexception [:reason]

  @impl true
  def message(%{reason: reason}), do: Kuma.format_error(reason)
end
