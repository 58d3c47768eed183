-- The shape of the backend: tables, RLS everywhere, no grants to anon, definer functions pinned.
begin;
\ir fixtures/world.sql
select plan(19);

select has_table('public', t, t || ' exists') from unnest(array[
  'edge_agents', 'device_status', 'relay_slaves', 'relay_commands_slave', 'decision_rules',
  'decision_rule_tombstones', 'telemetry_data', 'event_logs', 'system_status', 'macros',
  'macro_actions']) as t;

select is(
  (select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace
    where n.nspname = 'public' and c.relkind = 'r' and not c.relrowsecurity),
  0::bigint, 'every table in public has row-level security enabled');

select is(
  (select count(*) from information_schema.role_table_grants
    where grantee = 'anon' and table_schema = 'public'),
  0::bigint, 'anon holds no privilege on any table');

select is(
  (select count(*) from pg_proc p join pg_namespace n on n.oid = p.pronamespace
    where n.nspname in ('public', 'private') and p.prosecdef
      and not exists (select 1 from unnest(p.proconfig) c where c like 'search_path=%')),
  0::bigint, 'every SECURITY DEFINER function sets a fixed search_path');

select ok(not has_function_privilege('anon', 'public.get_and_lock_slave_commands(text,integer,integer,text)', 'execute'),
  'anon cannot call get_and_lock_slave_commands');
select ok(not has_function_privilege('anon', 'public.complete_slave_command(bigint,integer,boolean[])', 'execute'),
  'anon cannot call complete_slave_command');
select ok(has_function_privilege('authenticated', 'public.get_active_decision_rules(text,integer)', 'execute'),
  'authenticated can call get_active_decision_rules');
select ok(not has_schema_privilege('anon', 'private', 'usage'), 'anon cannot reach the private schema');
select ok((select rolbypassrls from pg_roles where rolname = 'service_role'), 'service_role bypasses RLS');

select * from finish();
rollback;
