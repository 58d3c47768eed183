-- The backend accepts what PROTOCOL.md lets a master send (issue 11, point 10): a reading's unit
-- is up to 256 bytes there, so the 16-character limit refused such readings for good and the
-- agent lost them. Runs unchanged on hosted Supabase; every statement can run twice.

alter table public.telemetry_data drop constraint if exists telemetry_data_unit_length;
alter table public.telemetry_data
  add constraint telemetry_data_unit_length check (octet_length(unit) <= 256);
