{{/* Names and labels shared by every template. nameOverride replaces the chart's name in names
     and labels; fullnameOverride replaces the whole "<release>-<name>" prefix. */}}
{{- define "orchardist.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "orchardist.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "orchardist.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "orchardist.labels" -}}
app.kubernetes.io/name: {{ include "orchardist.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "orchardist.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orchardist.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "orchardist.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-operator" (include "orchardist.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespace holding the agents' Lease heartbeats (fixed by the API contract). */}}
{{- define "orchardist.systemNamespace" -}}orchardist-system{{- end -}}

{{/* Prefix of every agent ServiceAccount's username; the rest is the node name. */}}
{{- define "orchardist.agentUserPrefix" -}}
{{- printf "system:serviceaccount:%s:orchardist-agent-" .Release.Namespace -}}
{{- end -}}
