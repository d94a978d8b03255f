-- The plan version each customer is billed under for a month (the version in force at the period start).
/* config
materialized: table
partitioned_by: billing_monthly
time_column: month
grain: [month, customer_id]
group: billing
*/
with customers as (
    select * from stg_seeds__customers
),

plans as (
    select * from stg_seeds__plans
),

currencies as (
    select * from stg_seeds__currencies
),

plan_versions as (
    select * from plans
    where effective_from <= $start_date::date
    qualify row_number() over (partition by plan_id order by effective_from desc, plan_version desc) = 1
),

final as (
    select
        $start_date::date as month,
        $end_date::date as period_end,
        customers.customer_id,
        customers.customer_name,
        customers.currency,
        plan_versions.plan_id,
        plan_versions.plan_version,
        plan_versions.plan_name,
        plan_versions.base_fee,
        plan_versions.risk_multiplier,
        currencies.minor_unit_exponent,
        cast(pow(10, currencies.minor_unit_exponent) as bigint) as minor_per_major
    from customers
    inner join plan_versions
        on customers.plan_id = plan_versions.plan_id
    inner join currencies
        on customers.currency = currencies.currency
)

select * from final
